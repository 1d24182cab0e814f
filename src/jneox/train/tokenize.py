"""``jneox tokenize``: text files, JSONL or a saved Hugging Face dataset into an indexed dataset
(:mod:`.indexed`, the ``.bin`` + ``.idx`` of Megatron-LM and GPT-NeoX), once, for any corpus size.

The inputs are cut into chunks at line boundaries (a text file, one document, is one chunk; a saved
dataset is cut by rows; a dataset streamed with ``datasets.load_dataset(..., streaming=True)`` comes
last, read row by row in this process and cut into chunks of about ``chunk_bytes`` of text, never
materialised). Worker processes tokenize chunks with the same :meth:`Tokenizer.encode` as
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
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import kernels
from ..errors import UsageError
from ..tokenizer import Tokenizer
from .data import (DataError, DataStats, is_jsonl, jsonl_texts, jsonl_utf8_texts, parse_jsonl_line,
                   text_document)
from .indexed import BIN, IDX, token_dtype, write_index

CHUNK_BYTES = 8 << 20  # of input text per chunk: the unit of parallel work and of resuming
HF_CHUNK_ROWS = 10_000
DEFAULT_PREFIX = "data"  # --out DIR writes DIR/data.bin and DIR/data.idx
PARTIAL, LENGTHS, PROGRESS = ".bin.partial", ".lengths.partial", ".progress.json"
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class Chunk:
    """Bytes (or rows of a saved or streamed dataset) ``start:stop`` of input ``source``."""

    source: int
    path: str
    kind: str  # "jsonl", "text", "hf" or "stream"
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


@dataclass(frozen=True)
class HFStream:
    """A dataset read with ``datasets.load_dataset(path, config, split=split, data_files=data_files,
    streaming=True)``: a hub name, a loading script, or a builder (``json``, ``text``, ``parquet``)
    over local ``data_files``. Its rows must come in the same order at every read (no shuffling), as
    the resume of an unfinished run skips the rows already written."""

    path: str
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.path + (f"/{self.config}" if self.config else "") + f"[{self.split}]"

    def identity(self) -> dict:
        files = [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns]
                 if Path(f).is_file() else [f] for f in self.data_files or ()]
        return {"path": self.path, "config": self.config, "split": self.split, "data_files": files}


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


def _open_stream(stream: HFStream):
    try:
        import datasets  # optional dependency: only Hugging Face datasets need it
    except ImportError:
        raise DataError(stream.name, None, "a Hugging Face dataset; reading it needs the `datasets` package") from None
    files = list(stream.data_files) if stream.data_files else None
    try:
        return datasets.load_dataset(stream.path, stream.config, split=stream.split, data_files=files, streaming=True)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(stream.name, None, f"cannot be streamed: {e}") from None


def stream_chunks(stream: HFStream, source: int, text_field: str, skip: int, chunk_bytes: int):
    """(chunk, texts, problems) of ``stream`` after its first ``skip`` rows: rows in order, a chunk
    once its texts reach ``chunk_bytes`` of UTF-8. Rows are numbered from 1 in the whole stream."""
    rows = iter(_open_stream(stream))
    for _ in range(skip):  # read again, not tokenized again: a stream has no random access
        if next(rows, None) is None:
            raise DataError(stream.name, None, f"has fewer rows than the {skip} an unfinished run wrote; "
                                               f"pass --overwrite to start over")
    number = skip
    while True:
        texts, problems, size, start = [], [], 0, number
        for row in rows:
            number += 1
            t = row.get(text_field) if isinstance(row, dict) else None
            if isinstance(t, str):
                texts.append(t)
                size += len(t.encode("utf-8"))
            elif not isinstance(row, dict) or text_field not in row:
                keys = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                problems.append((number - start, f"no {text_field!r} field (keys: {keys or 'none'})"))
            else:
                problems.append((number - start, f"field {text_field!r} must be a string, got {type(t).__name__}"))
            if size >= chunk_bytes:
                break
        if number == start:
            return
        yield Chunk(source, stream.name, "stream", start, number, size, False), texts, problems


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


def _read(chunk: Chunk) -> bytes:
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        return f.read(chunk.stop - chunk.start)


def _texts(chunk: Chunk, text_field: str, data: bytes | None = None) -> tuple[list[str], int, int, list[tuple[int, str]]]:
    """(documents, lines, non-blank lines, problems) of a chunk (of ``data``, its bytes, if read already);
    lines count from 1 within it."""
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
    if data is None:
        data = _read(chunk)
    if chunk.kind == "text":
        try:
            texts.append(text_document(chunk.path, data))
        except DataError as e:
            problems.append((e.line or 1, e.problem))
        return texts, 1, 1, problems
    fast = jsonl_texts(data, text_field)
    if fast is not None:
        return fast, len(fast), len(fast), problems
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


def encode_chunk(chunk: Chunk, text_field: str, dtype: str, streamed: tuple | None = None) -> ChunkResult:
    """Tokenize one chunk in this worker: every document's ids, then ``</s>``, packed by numpy. A
    streamed chunk comes with its (texts, problems), read by the main process."""
    data = _read(chunk) if streamed is None and chunk.kind != "hf" else None
    # JSONL as the UTF-8 bytes sentencepiece reads, in one compiled pass, where the scanner takes the chunk
    utf8 = jsonl_utf8_texts(data, text_field, _tokenizer.writes_nl) if chunk.kind == "jsonl" else None
    if utf8 is not None:
        docs = _tokenizer.encode_utf8_batch(utf8, eos=True)
        n_lines = nonblank = len(utf8)
        problems = []
    else:
        if streamed is None:
            texts, n_lines, nonblank, problems = _texts(chunk, text_field, data)
        else:
            (texts, problems), n_lines = streamed, chunk.stop - chunk.start
            nonblank = n_lines
        docs = _tokenizer.encode_batch(texts, eos=True)
    lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
    # straight into the little-endian token dtype: the ids are below the vocabulary size it was chosen for
    out = np.dtype(dtype).newbyteorder("<")
    ids = np.concatenate(docs, dtype=out, casting="unsafe") if docs else np.empty(0, out)
    return ChunkResult(ids, lengths, n_lines, nonblank, problems)


# ---- the writer -------------------------------------------------------------------------------------
def _fsync_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fingerprint(paths: list[str], stream: HFStream | None, model_file: Path, text_field: str, chunk_bytes: int,
                 dtype: np.dtype, skip_bad_lines: bool) -> dict:
    inputs = []
    for p in paths:
        st = Path(p).stat()
        inputs.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    return {"inputs": inputs, "stream": stream.identity() if stream else None, "tokenizer": digest, "text_field": text_field, "chunk_bytes": chunk_bytes,
            "dtype": np.dtype(dtype).name, "skip_bad_lines": skip_bad_lines}


def _paths(prefix: Path) -> dict[str, Path]:
    return {k: Path(str(prefix) + suffix) for k, suffix in
            (("bin", BIN), ("idx", IDX), ("partial", PARTIAL), ("lengths", LENGTHS), ("progress", PROGRESS))}


def tokenize_files(paths: list[str], tokenizer_path: str | os.PathLike, out: str | os.PathLike, workers: int = 1,
                   text_field: str = "text", skip_bad_lines: bool = False, chunk_bytes: int = CHUNK_BYTES,
                   overwrite: bool = False, progress: bool = True, stream: HFStream | None = None) -> TokenizeResult:
    """Tokenize ``paths``, then ``stream``, into the indexed dataset ``output_prefix(out)``; resumes an
    unfinished run of the same inputs. Returns what was written."""
    if not paths and stream is None:
        raise UsageError("nothing to tokenize: give --data files or a --hf-dataset")
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
    if stream is not None:
        _open_stream(stream)  # a name or files that cannot be read fail now, not after the files
    fingerprint = _fingerprint([str(p) for p in paths], stream, model_file, text_field, chunk_bytes, dtype,
                               skip_bad_lines)

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
        state = {"fingerprint": fingerprint, "chunks": 0, "stream_rows": 0, "bin_bytes": 0, "documents": 0, "lines": 0,
                 "nonblank": 0, "skipped": 0, "messages": [], "finished": False}
        _fsync_write_json(files["progress"], state)
    stats = DataStats(skipped_lines=state["skipped"], skipped=list(state["messages"]))

    if not state["finished"]:
        todo = _work(chunks[state["chunks"]:], stream, len(paths), text_field, state["stream_rows"], chunk_bytes)
        total = None if stream else sum(c.size for c in chunks)
        _write_chunks(todo, state, files, model_file, dtype, text_field, skip_bad_lines, workers,
                      stats, progress, total, sum(c.size for c in chunks[:state["chunks"]]) + state.get("stream_bytes", 0))
        if stream is not None and state["stream_rows"] == 0:
            error = DataError(stream.name, None, "the dataset has no rows")
            if not skip_bad_lines:
                raise error
            stats.skip(error)
        if state["documents"] == 0:
            names = [str(p) for p in paths] + ([stream.name] if stream else [])
            raise DataError(", ".join(names), None, "no documents to tokenize")
        state["finished"] = True
        _fsync_write_json(files["progress"], state)
    _finish(files, state, dtype)
    n_tokens = state["bin_bytes"] // dtype.itemsize
    return TokenizeResult(prefix, state["documents"], n_tokens, sum(c.size for c in chunks) + state.get("stream_bytes", 0),
                          time.perf_counter() - t0, stats)


def _work(file_chunks: list[Chunk], stream: HFStream | None, source: int, text_field: str, stream_rows: int,
          chunk_bytes: int):
    """(chunk, streamed) to tokenize: the files' chunks (the worker reads them), then the stream's
    (read here: streamed is their (texts, problems))."""
    for c in file_chunks:
        yield c, None
    if stream is not None:
        for c, texts, problems in stream_chunks(stream, source, text_field, stream_rows, chunk_bytes):
            yield c, (texts, problems)


def _start_method() -> str:
    """fork where there is one, as torch's DataLoader workers do: a worker starts at once instead of
    importing torch again (the main process has run no torch op and started no thread yet)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _write_chunks(todo, state: dict, files: dict, model_file: Path,
                  dtype: np.dtype, text_field: str, skip_bad_lines: bool, workers: int, stats: DataStats,
                  progress: bool, total_bytes: int | None, done_bytes: int) -> None:
    pool = None
    kernels.library()  # the JSONL scanner: built (on a first run) and loaded here once, before the workers fork
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
                results = ((c, encode_chunk(c, text_field, dtype.name, streamed)) for c, streamed in todo)
            else:
                results = _ordered(pool, todo, text_field, dtype.name, window=2 * workers)
            for chunk, result in results:
                _commit(chunk, result, state, bin_f, len_f, files, skip_bad_lines, stats)
                tokens_written += len(result.tokens)
                bar.update(chunk.size)
                bar.set_postfix_str(f"{tokens_written / max(time.perf_counter() - t_start, 1e-9):,.0f} tok/s")
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()


def _ordered(pool, todo, text_field: str, dtype: str, window: int):
    """(chunk, the workers' result) in chunk order, with at most ``window`` chunks in flight."""
    pending: deque = deque()
    it = iter(todo)
    for c, streamed in it:
        pending.append((c, pool.apply_async(encode_chunk, (c, text_field, dtype, streamed))))
        if len(pending) >= window:
            break
    while pending:
        c, result = pending.popleft()
        result = result.get()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt[0], pool.apply_async(encode_chunk, (nxt[0], text_field, dtype, nxt[1]))))
        yield c, result


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
    if chunk.kind == "stream":
        state["stream_rows"] = chunk.stop
        state["stream_bytes"] = state.get("stream_bytes", 0) + chunk.size
    if chunk.last:
        if state["nonblank"] == 0 and chunk.kind != "text":
            error = DataError(chunk.path, 1, "the file is empty")
            if not skip_bad_lines:
                raise error
            stats.skip(error)
        state["lines"] = state["nonblank"] = 0
    bin_f.write(result.tokens)  # little-endian already; written from the array's own buffer
    len_f.write(result.lengths.astype("<i4"))
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
