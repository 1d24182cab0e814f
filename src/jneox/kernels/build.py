"""Compiling the kernels (csrc/) into a shared library in a private cache folder, once per machine.

The cache folder (``$JNEOX_CACHE``, else ``$XDG_CACHE_HOME/jneox``) is created private (0o700). A library
is used from it only if the folder and the file belong to the current user and no one else may write
them, and if its bytes hash to what was recorded when it was built (a file damaged by a full disk, a
killed copy or a failing drive would otherwise crash every later run when loaded); otherwise it is
rebuilt. The compiler writes to a temporary name in the cache folder, renamed in only when complete; a
killed build's leftovers are removed by the next build.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path

from ..files import untrusted
from . import paths

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "jneox.c"  # the one compilation unit: it includes every other file of csrc/
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
# OpenMP, as JNEOX_OPENMP's shell words (Apple's clang has no runtime of its own: with Homebrew's libomp,
# JNEOX_OPENMP="-Xpreprocessor -fopenmp -I$(brew --prefix libomp)/include -L$(brew --prefix libomp)/lib -lomp")
OPENMP = "-fopenmp"
LIBS = ["-lm"]
PREFIX = "jneox-"  # built libraries: jneox-<key>.so, with their hash in jneox-<key>.so.sha256
TEMP_PREFIX = ".jneox-build-"  # a build in progress: .jneox-build-<pid>-<random><suffix>
STALE_AFTER_S = 24 * 3600  # a temporary file older than this is a leftover even if its pid was reused


def simd_forcible() -> bool:
    """Whether JNEOX_SIMD can cap the build on this machine (x86-64)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def cache_dir() -> Path:
    base = os.environ.get("JNEOX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "jneox")
    return Path(base).expanduser()


@lru_cache(maxsize=None)
def _cpu_flags_line() -> str:
    """The first flags line of /proc/cpuinfo ("flags" on x86, "Features" on ARM); "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists ``flag`` (False where there is no such file)."""
    return flag in _cpu_flags_line().partition(":")[2].split()


def _cpu_id() -> str:
    """-march=native code is only valid on the CPU it was built for: key the build by its flags."""
    return platform.machine() + _cpu_flags_line()


def _cache_folder() -> Path:
    """The cache folder, created 0o700; a private temporary folder where the cache cannot be trusted."""
    folder = cache_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    why = untrusted(folder)
    if why is None:
        return folder
    warnings.warn(f"jneox: not using the kernel cache: {why}; building in a private temporary folder "
                  f"(set JNEOX_CACHE to a folder of your own)", stacklevel=3)
    return Path(tempfile.mkdtemp(prefix="jneox-kernels-"))


def sources() -> list[Path]:
    """Every source file of the kernels (all of them feed the build key)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".c", ".h"))


def _key(command: list[str], flags: list[str]) -> str:
    h = hashlib.sha256()
    for src in sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update(" ".join(command + flags + LIBS).encode() + _cpu_id().encode())
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(target: Path) -> bool:
    """Whether ``target`` is a library of ours to load: private, and its bytes hash to the recorded hash
    (written, also private, only after a complete build)."""
    record = target.with_name(target.name + ".sha256")
    try:
        if not target.is_file() or untrusted(target) is not None or untrusted(record) is not None:
            return False
        return record.read_text(encoding="ascii").strip() == file_hash(target)
    except (OSError, UnicodeDecodeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Remove what builds killed halfway left in ``folder``: temporary files of our own naming whose
    process is gone (or that are older than STALE_AFTER_S); a build still running keeps its own."""
    for path in folder.glob(TEMP_PREFIX + "*"):
        pid = path.name[len(TEMP_PREFIX):].partition("-")[0]
        try:
            old = time.time() - path.lstat().st_mtime > STALE_AFTER_S
            if old or not pid.isdigit() or not _alive(int(pid)):
                path.unlink()
        except OSError:
            pass  # removed meanwhile by another build, or not ours to remove


def _write_private(folder: Path, target: Path, data: bytes) -> None:
    """Write ``target`` whole or not at all: a temporary file in ``folder``, renamed in."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".sha256", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(compiler: str | None = None, level: str | None = None) -> Path:
    """Compile the kernels (if not already built for these sources, compiler, flags, CPU and ``level``,
    one of :data:`paths.SIMD_LEVELS`, None for all the CPU has) and return the .so path. ``compiler``
    (default ``$CC``, else cc or gcc) is a shell word list, e.g. ``ccache gcc``."""
    command = shlex.split(compiler or os.environ.get("CC") or "") or \
        [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not command:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    flags = FLAGS + (paths.cap_flags(level) if level is not None and simd_forcible() else [])
    openmp = shlex.split(os.environ.get("JNEOX_OPENMP", OPENMP))
    try:
        return _compile(command, flags + openmp)
    except RuntimeError as e:
        if not openmp:
            raise
        try:  # a compiler without OpenMP (Apple's clang): the same kernels on one thread beat PyTorch's ops
            path = _compile(command, flags)
        except RuntimeError:
            raise e from None
        warnings.warn(f"jneox: the C compiler refused {shlex.join(openmp)!r}; the kernels run on one thread "
                      f"(set JNEOX_OPENMP to the flags that enable OpenMP)", stacklevel=2)
        return path


def _compile(command: list[str], flags: list[str]) -> Path:
    folder = _cache_folder()
    target = folder / f"{PREFIX}{_key(command, flags)}.so"
    if _intact(target):
        return target
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([*command, *flags, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f"cannot run the C compiler {shlex.join(command)!r}: {e}") from None
        if proc.returncode:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr.strip()}")
        os.chmod(tmp, 0o700)  # whatever the umask: a group-writable library would be refused next time
        digest = file_hash(Path(tmp))
        # the library first, then its hash: a reader between the two sees a mismatch and rebuilds
        os.replace(tmp, target)  # atomic (also over a refused file): a concurrent build writes the same bytes
        _write_private(folder, target.with_name(target.name + ".sha256"), digest.encode() + b"\n")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
