"""``jneox tokenize``: text files, JSONL or a saved Hugging Face dataset into an indexed dataset
(:mod:`.indexed`, the ``.bin`` + ``.idx`` of Megatron-LM and GPT-NeoX), once, for any corpus size.

The inputs are cut into chunks at line boundaries (a text file, one document, is one chunk; a saved
dataset is cut by rows). Worker processes tokenize chunks with the same :meth:`Tokenizer.encode` as
on-the-fly pretraining and append ``</s>`` to every document; the main process writes their results in
chunk order, so the bytes do not depend on the number of workers. After each chunk the ``.bin`` and
the lengths written so far are fsynced and a progress file records how far they are valid: a killed
run, run again with the same inputs, cuts the files back to that point and goes on, and ends with
the bytes an uninterrupted run writes. The ``.idx`` is written last, from the lengths on disk.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import UsageError
from ..tokenizer import Tokenizer
from .data import DataError, DataStats, is_jsonl, parse_jsonl_line, text_document
from .indexed import BIN, IDX, token_dtype, write_index

CHUNK_BYTES = 8 << 20  # of input text per chunk: the unit of parallel work and of resuming
HF_CHUNK_ROWS = 10_000
DEFAULT_PREFIX = "data"  # --out DIR writes DIR/data.bin and DIR/data.idx
PARTIAL, LENGTHS, PROGRESS = ".bin.partial", ".lengths.partial", ".progress.json"
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class Chunk:
    """Bytes (or rows of a saved dataset) ``start:stop`` of input ``source``."""

    source: int
    path: str
    kind: str  # "jsonl", "text" or "hf"
    start: int
    stop: int
    size: int  # input bytes, for the progress bar
    last: bool  # the last chunk of its input


@dataclass
class ChunkResult:
    tokens: np.ndarray
    lengths: np.ndarray  # int32, one per document
    lines: int  # lines (rows) the chunk spans
    nonblank: int
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line within the chunk, problem)


@dataclass
class TokenizeResult:
    prefix: Path
    documents: int
    tokens: int
    input_bytes: int
    seconds: float
    stats: DataStats


def output_prefix(out: str | os.PathLike) -> Path:
    """``--out``: a folder (existing, or written with a trailing slash) gets ``data.bin``/``data.idx``,
    anything else is the prefix itself."""
    p = Path(out)
    if p.is_dir() or str(out).endswith(("/", os.sep)):
        return p / DEFAULT_PREFIX
    return p.with_suffix("") if p.suffix in (BIN, IDX) else p


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


def _load_hf(path: str):
    try:
        import datasets  # optional dependency: only saved Hugging Face datasets need it
    except ImportError:
        raise DataError(path, None, "a saved Hugging Face dataset; reading it needs the `datasets` package") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(path, None, f"a dataset with splits {', '.join(ds)} and no 'train'; save the split to use")
        ds = ds["train"]
    return ds


def plan_chunks(paths: list[str], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """The chunks of the inputs, a pure function of their contents and ``chunk_bytes``."""
    chunks = []
    for source, name in enumerate(paths):
        path = Path(name)
        if _is_hf_dataset(path):
            ds = _load_hf(name)
            n, nbytes = len(ds), max(1, ds.data.nbytes)
            starts = list(range(0, n, HF_CHUNK_ROWS)) or [0]
            for s in starts:
                stop = min(n, s + HF_CHUNK_ROWS)
                chunks.append(Chunk(source, name, "hf", s, stop, nbytes * (stop - s) // max(n, 1), stop == n))
            continue
        if path.is_dir():
            raise DataError(path, None, "is a directory, expected a text or .jsonl file or a saved Hugging Face dataset")
        if not path.is_file():
            raise DataError(path, None, "no such file")
        size = path.stat().st_size
        if not is_jsonl(path):
            chunks.append(Chunk(source, name, "text", 0, size, size, True))
            continue
        with open(path, "rb") as f:
            start = 0
            while True:
                f.seek(start + chunk_bytes)
                if start + chunk_bytes >= size or not f.readline() or f.tell() >= size:
                    chunks.append(Chunk(source, name, "jsonl", start, size, size - start, True))
                    break
                chunks.append(Chunk(source, name, "jsonl", start, f.tell(), f.tell() - start, False))
                start = f.tell()
    return chunks


# ---- the workers ------------------------------------------------------------------------------------
_tokenizer: Tokenizer | None = None  # one per worker process, loaded by _init_worker
_hf_cache: dict = {}


def _init_worker(model_file: str) -> None:
    global _tokenizer
    _tokenizer = Tokenizer(model_file)


def _texts(chunk: Chunk, text_field: str) -> tuple[list[str], int, int, list[tuple[int, str]]]:
    """(documents, lines, non-blank lines, problems) of a chunk; lines count from 1 within it."""
    problems: list[tuple[int, str]] = []
    texts: list[str] = []
    if chunk.kind == "hf":
        if chunk.path not in _hf_cache:
            _hf_cache[chunk.path] = _load_hf(chunk.path)
        ds = _hf_cache[chunk.path]
        if text_field not in ds.column_names:
            raise DataError(chunk.path, None, f"no {text_field!r} column (columns: {', '.join(ds.column_names)})")
        column = ds[chunk.start:chunk.stop][text_field]
        for i, t in enumerate(column, start=1):
            if isinstance(t, str):
                texts.append(t)
            else:
                problems.append((i, f"field {text_field!r} must be a string, got {type(t).__name__}"))
        return texts, len(column), len(column), problems
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.stop - chunk.start)
    if chunk.kind == "text":
        try:
            texts.append(text_document(chunk.path, data))
        except DataError as e:
            problems.append((e.line or 1, e.problem))
        return texts, 1, 1, problems
    path = Path(chunk.path)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the last line opens no new one
    nonblank = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        nonblank += 1
        try:
            texts.append(parse_jsonl_line(path, number, raw, text_field))
        except DataError as e:
            problems.append((number, e.problem))
    return texts, len(lines), nonblank, problems


def encode_chunk(chunk: Chunk, text_field: str, dtype: str) -> ChunkResult:
    """Tokenize one chunk in this worker: every document's ids, then ``</s>``."""
    texts, n_lines, nonblank, problems = _texts(chunk, text_field)
    docs = _tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int32, count=len(docs))
    tokens = np.empty(int(lengths.sum(dtype=np.int64)), dtype=np.dtype(dtype).newbyteorder("<"))
    ends = np.cumsum(lengths, dtype=np.int64) - 1
    body = np.ones(len(tokens), dtype=bool)
    body[ends] = False
    tokens[ends] = _tokenizer.eos_id
    tokens[body] = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=len(tokens) - len(docs))
    return ChunkResult(tokens, lengths, n_lines, nonblank, problems)


# ---- the writer -------------------------------------------------------------------------------------
def _fsync_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fingerprint(paths: list[str], model_file: Path, text_field: str, chunk_bytes: int, dtype: np.dtype,
                 skip_bad_lines: bool) -> dict:
    inputs = []
    for p in paths:
        st = Path(p).stat()
        inputs.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    return {"inputs": inputs, "tokenizer": digest, "text_field": text_field, "chunk_bytes": chunk_bytes,
            "dtype": np.dtype(dtype).name, "skip_bad_lines": skip_bad_lines}


def _paths(prefix: Path) -> dict[str, Path]:
    return {k: Path(str(prefix) + suffix) for k, suffix in
            (("bin", BIN), ("idx", IDX), ("partial", PARTIAL), ("lengths", LENGTHS), ("progress", PROGRESS))}


def tokenize_files(paths: list[str], tokenizer_path: str | os.PathLike, out: str | os.PathLike, workers: int = 1,
                   text_field: str = "text", skip_bad_lines: bool = False, chunk_bytes: int = CHUNK_BYTES,
                   overwrite: bool = False, progress: bool = True) -> TokenizeResult:
    """Tokenize ``paths`` into the indexed dataset ``output_prefix(out)``; resumes an unfinished run
    of the same inputs. Returns what was written."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if chunk_bytes < 1:
        raise UsageError(f"chunk size must be at least 1 byte, got {chunk_bytes}")
    t0 = time.perf_counter()
    tp = Path(tokenizer_path)
    model_file = tp / "spiece.model" if tp.is_dir() else tp
    tokenizer = Tokenizer(model_file)
    dtype = token_dtype(tokenizer.vocab_size)
    prefix = output_prefix(out)
    files = _paths(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    chunks = plan_chunks([str(p) for p in paths], chunk_bytes)
    fingerprint = _fingerprint([str(p) for p in paths], model_file, text_field, chunk_bytes, dtype, skip_bad_lines)

    state = None
    if files["progress"].is_file() and not overwrite:
        state = json.loads(files["progress"].read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            raise UsageError(f"{files['progress']}: an unfinished tokenize run of other inputs or options; "
                             f"run it again as it was, or pass --overwrite to start over")
    elif (files["bin"].exists() or files["idx"].exists()) and not overwrite:
        raise UsageError(f"{prefix}{BIN}/{IDX} already exist; pass --overwrite to replace them")
    if state is None:
        for p in files.values():
            p.unlink(missing_ok=True)
        state = {"fingerprint": fingerprint, "chunks": 0, "bin_bytes": 0, "documents": 0, "lines": 0,
                 "nonblank": 0, "skipped": 0, "messages": [], "finished": False}
        _fsync_write_json(files["progress"], state)
    stats = DataStats(skipped_lines=state["skipped"], skipped=list(state["messages"]))

    todo = chunks[state["chunks"]:]
    if not state["finished"]:
        _write_chunks(todo, state, files, model_file, dtype, text_field, skip_bad_lines, workers,
                      stats, progress, sum(c.size for c in chunks), sum(c.size for c in chunks[:state["chunks"]]))
        if state["documents"] == 0:
            raise DataError(", ".join(str(p) for p in paths), None, "no documents to tokenize")
        state["finished"] = True
        _fsync_write_json(files["progress"], state)
    _finish(files, state, dtype)
    n_tokens = state["bin_bytes"] // dtype.itemsize
    return TokenizeResult(prefix, state["documents"], n_tokens, sum(c.size for c in chunks),
                          time.perf_counter() - t0, stats)


def _start_method() -> str:
    """fork where there is one, as torch's DataLoader workers do: a worker starts at once instead of
    importing torch again (the main process has run no torch op and started no thread yet)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _write_chunks(todo: list[Chunk], state: dict, files: dict, model_file: Path,
                  dtype: np.dtype, text_field: str, skip_bad_lines: bool, workers: int, stats: DataStats,
                  progress: bool, total_bytes: int, done_bytes: int) -> None:
    pool = None
    if workers > 1:  # before the progress bar, whose monitor thread a fork must not copy
        pool = multiprocessing.get_context(_start_method()).Pool(workers, initializer=_init_worker,
                                                                   initargs=(str(model_file),))
    bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress, dynamic_ncols=True)
    t_start, tokens_written = time.perf_counter(), 0
    try:
        with open(files["partial"], "ab") as bin_f, open(files["lengths"], "ab") as len_f:
            if bin_f.tell() < state["bin_bytes"] or len_f.tell() < 4 * state["documents"]:
                raise DataError(files["partial"], None, "shorter than its progress file records; pass --overwrite "
                                                        "to start over")
            # a killed run may have written past its last commit: cut back to it
            bin_f.truncate(state["bin_bytes"])
            len_f.truncate(4 * state["documents"])
            if pool is None:
                _init_worker(str(model_file))
                results = (encode_chunk(c, text_field, dtype.name) for c in todo)
            else:
                results = _ordered(pool, todo, text_field, dtype.name, window=2 * workers)
            for chunk, result in zip(todo, results):
                _commit(chunk, result, state, bin_f, len_f, files, skip_bad_lines, stats)
                tokens_written += len(result.tokens)
                bar.update(chunk.size)
                bar.set_postfix_str(f"{tokens_written / max(time.perf_counter() - t_start, 1e-9):,.0f} tok/s")
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()


def _ordered(pool, todo: list[Chunk], text_field: str, dtype: str, window: int):
    """The workers' results in chunk order, with at most ``window`` chunks in flight."""
    pending: deque = deque()
    it = iter(todo)
    for c in it:
        pending.append(pool.apply_async(encode_chunk, (c, text_field, dtype)))
        if len(pending) >= window:
            break
    while pending:
        result = pending.popleft().get()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.apply_async(encode_chunk, (nxt, text_field, dtype)))
        yield result


def _commit(chunk: Chunk, result: ChunkResult, state: dict, bin_f, len_f, files: dict, skip_bad_lines: bool,
            stats: DataStats) -> None:
    """Append a chunk's tokens and lengths, make them durable, then record them as done."""
    for number, problem in result.problems:
        error = DataError(chunk.path, state["lines"] + number, problem)
        if not skip_bad_lines:
            raise error
        stats.skip(error)
    state["lines"] += result.lines
    state["nonblank"] += result.nonblank
    if chunk.last:
        if state["nonblank"] == 0 and chunk.kind != "text":
            error = DataError(chunk.path, 1, "the file is empty")
            if not skip_bad_lines:
                raise error
            stats.skip(error)
        state["lines"] = state["nonblank"] = 0
    bin_f.write(result.tokens.tobytes())
    len_f.write(result.lengths.astype("<i4").tobytes())
    bin_f.flush()
    len_f.flush()
    os.fsync(bin_f.fileno())
    os.fsync(len_f.fileno())
    state["chunks"] += 1
    state["bin_bytes"] += result.tokens.nbytes
    state["documents"] += len(result.lengths)
    state["skipped"], state["messages"] = stats.skipped_lines, list(stats.skipped)
    _fsync_write_json(files["progress"], state)


def _finish(files: dict, state: dict, dtype: np.dtype) -> None:
    """The ``.idx`` from the lengths on disk, then both files under their names; the progress file
    goes last, so a kill in here is finished by the next run."""
    n = state["documents"]
    if files["lengths"].exists():
        lengths = np.memmap(files["lengths"], dtype="<i4", mode="r", shape=(n,))
        idx_tmp = Path(str(files["idx"]) + ".partial")
        write_index(idx_tmp, dtype, (lengths[s:s + (1 << 20)] for s in range(0, n, 1 << 20)), n)
        del lengths
        if files["partial"].exists():
            os.replace(files["partial"], files["bin"])
        os.replace(idx_tmp, files["idx"])
        files["lengths"].unlink()
    files["progress"].unlink(missing_ok=True)
