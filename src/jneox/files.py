"""The files jneox writes, by name, and writing them atomically: one file (:func:`staged_file`) or a
whole folder (:func:`staged_folder`, :func:`save_staged`), so that a kill at any moment leaves the old
output or the new one, never half of one, and never neither.

Outputs follow the umask, as other tools' do: folders are made with mode 0o777 and files with 0o666,
and the kernel takes the umask off (so a service account can read a model its owner prepared when
the umask allows it; a private umask keeps it private).

A folder jneox wrote holds :data:`MARKER` (written last, so it also says the folder is complete). Only
such a folder is replaced without ``--overwrite``."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
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
# a PEFT adapter folder
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# a training run's folder: a checkpoint plus these
STATE_FILE, LOG_FILE, REPORT_FILE = "trainer_state.pt", "train_log.jsonl", "loss.png"
# Written into every folder jneox saves (last, so it also marks the folder complete) and into a training
# run's folder when the run starts. transformers and the hub ignore files they do not know.
MARKER = "jneox.json"
MARKER_FORMAT = 1

# What jneox writes into a checkpoint or training-run folder. A marked folder holding only these is a
# previous checkpoint (of this run, or one the user asks to write again) and is replaced without
# asking; anything else in it means it is the user's folder, which is never deleted unless asked.
_OWN_FILES = re.compile("|".join([
    re.escape(CONFIG_FILE), re.escape(GENERATION_CONFIG), r"model(-\d{5}-of-\d{5})?\.safetensors",
    re.escape(SAFETENSORS_INDEX), re.escape(TOKENIZER_FILE), re.escape(TOKENIZER_CONFIG),
    re.escape(SPECIAL_TOKENS_MAP), re.escape(TOKENIZER_JSON),
    re.escape(STATE_FILE), re.escape(LOG_FILE), re.escape(REPORT_FILE), re.escape(MARKER),
    re.escape(ADAPTER_CONFIG), re.escape(ADAPTER_WEIGHTS)]))
_STAGING, _OLD = ".staging-", ".old-"
# renameat2(2): AT_FDCWD makes its paths relative to the working directory, as rename's are
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only be read by setting it, which
    races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as folder:  # elsewhere: the mode the kernel gives a new file
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777))
        return 0o777 & ~stat.S_IMODE(os.stat(probe).st_mode)


def follow_umask(path: Path) -> None:
    """Give a file that a library wrote private (safetensors makes its files 0600) the mode any new file
    gets: 0o666 less the umask."""
    os.chmod(path, 0o666 & ~umask())


def _unique(parent: Path, prefix: str, suffix: str = "") -> Iterator[Path]:
    while True:
        yield parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _new_file(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty file with mode 0o666 less the umask (mkstemp would make it 0600)."""
    for name in _unique(parent, prefix, suffix):
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:
            continue


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder with mode 0o777 less the umask (mkdtemp would make it 0700)."""
    for name in _unique(parent, prefix):
        try:
            os.mkdir(name, 0o777)
            return name
        except FileExistsError:
            continue


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it is renamed over
    ``path`` (a reader never sees half a file; a hard link to the old file keeps the old content), else
    it is deleted and any previous ``path`` is left as it was. Beside, not in /tmp: a rename cannot cross
    file systems."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = _new_file(path.parent, f".{path.name}.", ".partial")
    try:
        yield name
        os.replace(name, path)
    except BaseException:
        name.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """``obj`` as UTF-8 JSON (non-ASCII kept as is, indented as Hugging Face's files are), newline-terminated."""
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_marker(folder: Path) -> None:
    """Mark ``folder`` as written by jneox (see :data:`MARKER`). A new file: one copied in as a hard link
    must not be written through."""
    (folder / MARKER).unlink(missing_ok=True)
    write_json(folder / MARKER, {"format": MARKER_FORMAT})


def is_marked(folder: Path) -> bool:
    """Whether ``folder`` holds the marker a complete jneox save writes last."""
    return (folder / MARKER).is_file()


def output_folder(out: str | os.PathLike) -> Path:
    """Where a folder named ``out`` is written: a symlink is followed (its target is written and the link
    kept, so an ``--out`` pointing at a bigger disk stays pointing there)."""
    out = Path(out)
    return out.resolve() if out.is_symlink() else out


def check_replaceable(out: str | os.PathLike, overwrite: bool = False, unmarked_ok: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``out`` may be replaced by a new checkpoint: it does not
    exist, is empty, or holds :data:`MARKER` and only files jneox writes; ``overwrite`` allows any folder.
    A folder of jneox's file names without the marker (a user's own ``config.json``, or a checkpoint
    written by a jneox version older than the marker) needs ``overwrite``, unless ``unmarked_ok`` (a
    run that is resumed names its folder on purpose)."""
    out = output_folder(out)
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another output folder, or pass "
                              f"--overwrite to replace it")
    names = [p for p in out.iterdir()]
    foreign = sorted(p.name for p in names if not (p.is_file() and _OWN_FILES.fullmatch(p.name)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CheckpointError(f"{out}: not a jneox checkpoint folder (it holds {shown}); refusing to replace it. "
                              f"Choose another output folder, or pass --overwrite to replace it and everything in it")
    if names and not unmarked_ok and not is_marked(out):
        raise CheckpointError(f"{out}: has no {MARKER}, so jneox did not write it (or an older jneox version did); "
                              f"refusing to replace it. Choose another output folder, or pass --overwrite to replace it")


def exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): True when
    done, False where the platform or file system has no such call (the caller then renames)."""
    function = getattr(_libc(), "renameat2", None)
    if function is None:
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _leftovers(out: Path) -> list[Path]:
    """The staging and set-aside folders of saves to ``out`` beside it."""
    return [p for pattern in (f".{out.name}{_STAGING}*", f".{out.name}{_OLD}*") for p in out.parent.glob(pattern)]


def recover(out: str | os.PathLike) -> Path | None:
    """Put back ``out`` when a save was killed between setting the old ``out`` aside and renaming the new
    one in (possible only where :func:`exchange` is not): of the set-aside copies and the complete (marked)
    staging folders, the newest becomes ``out`` again, and stderr says so. Returns what was restored."""
    out = output_folder(out)
    if out.exists() or out.is_symlink():
        return None
    candidates = [p for p in _leftovers(out) if p.is_dir() and (p.name.startswith(f".{out.name}{_OLD}") or is_marked(p))]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: (p / MARKER).stat().st_mtime if is_marked(p) else p.stat().st_mtime)
    os.replace(newest, out)
    print(f"jneox: {out} was missing after an interrupted save; restored it from {newest.name}, "
          f"the newest complete copy", file=sys.stderr)
    return newest


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder atomically: yields an empty staging folder beside ``out_dir``; when the block ends
    without an error :data:`MARKER` is written into it and it takes ``out_dir``'s place, else it is deleted
    and ``out_dir`` is untouched. An existing ``out_dir`` must pass :func:`check_replaceable` (checked
    before and after writing); it is swapped with the new folder in one step where the platform can
    (:func:`exchange`), else renamed aside first, and deleted after. A kill between those two renames
    leaves both copies, which :func:`recover` (run first here and by training runs) puts back.

    An ``out_dir`` that is a symlink is kept: the folder it points to is what is replaced."""
    out = output_folder(out_dir)
    recover(out)
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(out.parent, f".{out.name}{_STAGING}")
    old = None
    try:
        yield tmp
        write_marker(tmp)
        check_replaceable(out, overwrite)
        if out.exists() and exchange(tmp, out):
            _remove(tmp)  # the old folder, now at the staging name
            return
        if out.exists():
            old = next(_unique(out.parent, f".{out.name}{_OLD}"))
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            _remove(old)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # failed between the two renames: the old one goes back
        _remove(tmp)
        raise


def save_staged(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """``write(folder)`` into a staging folder that then replaces ``out_dir`` (see :func:`staged_folder`);
    every saver of a whole folder goes through here."""
    with staged_folder(out_dir, overwrite) as tmp:
        write(tmp)
    return Path(out_dir)


def remove_stale_staging(out_dir: str | os.PathLike) -> None:
    """Delete the staging and set-aside folders a killed :func:`staged_folder` left beside ``out_dir``, once
    ``out_dir`` is complete (marked); a missing ``out_dir`` is first recovered (:func:`recover`), so the
    only complete copy is never what is deleted."""
    out = output_folder(out_dir)
    recover(out)
    if not is_marked(out):
        return
    for stale in _leftovers(out):
        _remove(stale)


def untrusted(path: Path) -> str | None:
    """Why a cache file or folder ``path`` may not be trusted (None if it belongs to this user and no one else may write it)."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & 0o022:
        return f"{path} may be written by others (mode {st.st_mode & 0o777:o})"
    return None
