"""The files jneox writes, by name, and writing them atomically: one file (:func:`staged_file`) or a
whole folder (:func:`staged_folder`, :func:`save_staged`), so that a kill at any moment leaves the old
output or the new one, never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import CheckpointError

# a checkpoint folder, in the Hugging Face layout
CONFIG_FILE = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILE = "spiece.model"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
SHARD = "model-{index:05d}-of-{count:05d}.safetensors"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# a training run's folder: a checkpoint plus these
STATE_FILE, LOG_FILE, REPORT_FILE = "trainer_state.pt", "train_log.jsonl", "loss.png"

# What jneox writes into a checkpoint or training-run folder. A folder holding only these is a
# previous checkpoint (of this run, or one the user asks to write again) and is replaced without
# asking; anything else in it means it is the user's folder, which is never deleted unless asked.
_OWN_FILES = re.compile("|".join([
    re.escape(CONFIG_FILE), re.escape(GENERATION_CONFIG), r"model(-\d{5}-of-\d{5})?\.safetensors",
    re.escape(SAFETENSORS_INDEX), re.escape(TOKENIZER_FILE), re.escape(TOKENIZER_CONFIG),
    re.escape(SPECIAL_TOKENS_MAP), re.escape(TOKENIZER_JSON),
    re.escape(STATE_FILE), re.escape(LOG_FILE), re.escape(REPORT_FILE)]))
_STAGING, _OLD = ".staging-", ".old-"


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it is renamed over
    ``path`` (a reader never sees half a file; a hard link to the old file keeps the old content), else
    it is deleted and any previous ``path`` is left as it was. Beside, not in /tmp: a rename cannot cross
    file systems."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp makes it 0600; the file is an ordinary output
    try:
        yield Path(name)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """``obj`` as UTF-8 JSON (non-ASCII kept as is, indented as Hugging Face's files are), newline-terminated."""
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def check_replaceable(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``out`` may be replaced by a new checkpoint: it does not
    exist, is empty, or holds only files jneox writes; ``overwrite`` allows any folder."""
    out = Path(out)
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another output folder, or pass "
                              f"--overwrite to replace it")
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and _OWN_FILES.fullmatch(p.name)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CheckpointError(f"{out}: not a jneox checkpoint folder (it holds {shown}); refusing to replace it. "
                              f"Choose another output folder, or pass --overwrite to replace it and everything in it")


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder atomically: yields an empty staging folder beside ``out_dir``; when the block ends
    without an error the staging folder takes ``out_dir``'s place (an old ``out_dir`` is renamed aside
    first and deleted after), else it is deleted and ``out_dir`` is untouched. So a kill at any moment
    leaves either the old folder or the new one. An existing ``out_dir`` must pass
    :func:`check_replaceable` (checked before and after writing)."""
    out = Path(out_dir)
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING}", dir=out.parent))
    try:
        yield tmp
        check_replaceable(out, overwrite)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}{_OLD}{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_staged(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """``write(folder)`` into a staging folder that then replaces ``out_dir`` (see :func:`staged_folder`);
    every saver of a whole folder goes through here."""
    with staged_folder(out_dir, overwrite) as tmp:
        write(tmp)
    return Path(out_dir)


def remove_stale_staging(out_dir: str | os.PathLike) -> None:
    """Delete the staging and set-aside folders a killed :func:`staged_folder` left beside ``out_dir``."""
    out = Path(out_dir)
    for pattern in (f".{out.name}{_STAGING}*", f".{out.name}{_OLD}*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
