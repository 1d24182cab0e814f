"""Native weight-only linear kernels for CPU decoding, compiled once per machine on first use.

``gemv.c`` is plain C with AVX2/FMA intrinsics, an AVX-512 path for decode batches, and portable C
where the CPU lacks them, built with the system C compiler (``cc -O3 -march=native -fopenmp``) into
a cache folder and loaded with ctypes after torch, so it shares torch's OpenMP runtime. Without a
compiler, or with ``JNEOX_KERNELS=0``, :func:`library` returns None and jneox uses PyTorch's own ops
instead (correct, slower).

``JNEOX_SIMD=portable|avx2|avx2vnni|avx512|avx512bf16|amx`` builds the kernels for at most that instruction set
(on x86-64; never more than the CPU has), so that every path can be run and tested on one machine
(the table at the top of gemv.c says which path needs what).

The cache folder (``$JNEOX_CACHE``, else ``$XDG_CACHE_HOME/jneox``) is created private (0o700). A
library is loaded from it only if the folder and the file belong to the current user and no one
else may write them; otherwise it is rebuilt (a shared or group-writable cache would let another
user plant code that jneox then runs).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
# OpenMP, as JNEOX_OPENMP's shell words (Apple's clang has no runtime of its own: with Homebrew's libomp,
# JNEOX_OPENMP="-Xpreprocessor -fopenmp -I$(brew --prefix libomp)/include -L$(brew --prefix libomp)/lib -lomp")
OPENMP = "-fopenmp"
LIBS = ["-lm"]
P, I = ctypes.c_void_p, ctypes.c_int
# rows the kernels take as one decode batch, each row's bits the same alone or among others: decode
# steps, the server's batches, speculative checks (quantize.py sends longer inputs to the prompt paths;
# model.py's fused attention takes up to this many new tokens per row)
MAX_KERNEL_ROWS = 16
SIGNATURES = {
    "jneox_linear_f32": [P, P, P, P, I, I, I, I],
    "jneox_linear_bf16": [P, P, P, P, I, I, I, I],
    "jneox_linear_int8": [P, P, P, P, P, I, I, I, P, I],
    "jneox_linear_int4": [P, P, P, P, P, I, I, I, I, P, I],
    "jneox_decode_attention": [P, P, P, I, I, I, P, P, P, I, I, I, I, I, P, P, I],
    "jneox_kernels_simd": [],
    "jneox_kernels_int8_dot": [],
    "jneox_prompt_bf16": [P, P, P, P, I, I, I, I],
    "jneox_prompt_int8": [P, P, P, P, P, I, I, I, I],
    "jneox_unpack_rows": [I, P, P, I, I, I, I, P, I, I],
    "jneox_amx": [],
    "jneox_prompt_amx": [I, P, P, P, P, P, I, I, I, I, P, I],
    "jneox_prompt_amx_scratch": [I, I, I, I],
}


# JNEOX_SIMD level -> what jneox_kernels_simd() returns, and the flags that cap -march=native there
# (x86-64 only: elsewhere the build is -march=native, e.g. NEON on 64-bit ARM, level 1)
# (avx2vnni: AVX2 with AVX-VNNI's integer dot products, as Intel's client CPUs since Alder Lake have;
# the same level 2, told apart by jneox_kernels_int8_dot; avx2 leaves them out, as the older CPUs lack them)
# (amx: AVX-512 BF16 with AMX tiles, Intel Xeon since Sapphire Rapids: prompts as tile multiplies)
SIMD_LEVELS = {"portable": 0, "avx2": 2, "avx2vnni": 2, "avx512": 3, "avx512bf16": 4, "amx": 5}
_NO_AMX = ["-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]
_CAP_FLAGS = {"portable": ["-mno-avx", "-mno-avx2", "-mno-fma", "-mno-f16c"], "avx2": ["-mno-avx512f", "-mno-avxvnni"],
              "avx2vnni": ["-mno-avx512f"], "avx512": ["-mno-avx512bf16", *_NO_AMX], "avx512bf16": _NO_AMX, "amx": []}


def simd_forcible() -> bool:
    """Whether JNEOX_SIMD can cap the build on this machine (x86-64)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def requested_simd() -> str | None:
    """The level ``JNEOX_SIMD`` asks for (None: whatever the CPU has)."""
    level = os.environ.get("JNEOX_SIMD", "").strip().lower() or None
    if level not in (None, "native") and level not in SIMD_LEVELS:
        from ..errors import UsageError

        raise UsageError(f"JNEOX_SIMD={level!r}: expected one of native, {', '.join(SIMD_LEVELS)}")
    return None if level == "native" else level


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


def _private(path: Path) -> str | None:
    """Why ``path`` may not be trusted (None if it belongs to this user and no one else may write it)."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & 0o022:
        return f"{path} may be written by others (mode {st.st_mode & 0o777:o})"
    return None


def _cache_folder() -> Path:
    """The cache folder, created 0o700; a private temporary folder where the cache cannot be trusted."""
    folder = cache_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    why = _private(folder)
    if why is None:
        return folder
    warnings.warn(f"jneox: not using the kernel cache: {why}; building in a private temporary folder "
                  f"(set JNEOX_CACHE to a folder of your own)", stacklevel=3)
    return Path(tempfile.mkdtemp(prefix="jneox-kernels-"))


def build(compiler: str | None = None, level: str | None = None) -> Path:
    """Compile gemv.c (if not already built for this source, compiler, flags, CPU and ``level``, one
    of :data:`SIMD_LEVELS`, None for all the CPU has) and return the .so path. ``compiler`` (default
    ``$CC``, else cc or gcc) is a shell word list, e.g. ``ccache gcc``."""
    command = shlex.split(compiler or os.environ.get("CC") or "") or \
        [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not command:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    flags = FLAGS + (_CAP_FLAGS[level] if level is not None and simd_forcible() else [])
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
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(command + flags + LIBS).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    folder = _cache_folder()
    target = folder / f"gemv-{key}.so"
    if target.is_file() and _private(target) is None:
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([*command, *flags, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f"cannot run the C compiler {shlex.join(command)!r}: {e}") from None
        if proc.returncode:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr.strip()}")
        os.chmod(tmp, 0o700)  # whatever the umask: a group-writable library would be refused next time
        os.replace(tmp, target)  # atomic (also over a refused file): a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library(level: str | None = None) -> ctypes.CDLL | None:
    """The loaded kernel library, or None (kernels disabled or not buildable: PyTorch fallback).
    ``level`` (default ``$JNEOX_SIMD``) caps the instruction set it is built for."""
    if os.environ.get("JNEOX_KERNELS", "1") == "0":
        return None
    level = level or requested_simd()
    if level is not None and level not in SIMD_LEVELS:
        raise ValueError(f"unknown SIMD level {level!r}; expected one of {', '.join(SIMD_LEVELS)}")
    return _load(level)


@lru_cache(maxsize=None)
def _load(level: str | None) -> ctypes.CDLL | None:
    import torch  # noqa: F401  (load torch's libgomp first so the kernels share its thread pool)

    try:
        path = build(level=level)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"jneox: native CPU kernels unavailable, using PyTorch ops instead ({e})", stacklevel=3)
        return None
    if path.parent != cache_dir():  # built in a private temporary folder: loaded, so no longer needed
        shutil.rmtree(path.parent, ignore_errors=True)
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = {"jneox_amx": ctypes.c_int, "jneox_prompt_amx_scratch": ctypes.c_long}.get(
            name, ctypes.c_int if name.startswith("jneox_kernels_") else None)
    return lib


@lru_cache(maxsize=None)
def simd_level(lib) -> int:
    """What the library was built with (``jneox_kernels_simd`` in gemv.c): 0 portable, 2 AVX2/FMA,
    3 AVX-512 (8 rows per pass for batches), 4 AVX-512 BF16 (also the bf16/int8 prompt kernels), 5 AMX
    (bf16/int8/int4 prompts as tile multiplies)."""
    return lib.jneox_kernels_simd()


@lru_cache(maxsize=None)
def int8_dot(lib) -> str:
    """How the int8 kernel multiplies (``jneox_kernels_int8_dot`` in gemv.c): "vnni" (dpbusd: AVX512-VNNI
    or AVX-VNNI), "avx2" (maddubs/madd), "neon" or "scalar"; every one on int8-rounded activations."""
    return ("scalar", "neon", "avx2", "vnni")[lib.jneox_kernels_int8_dot()]


def has_batch_path(lib) -> bool:
    """Whether the kernels take prompts too, in chunks of PREFILL_CHUNK rows (AVX-512). Decode batches of
    up to 16 rows take several rows per pass at every level (AVX2: 3 in fp32, 4 in bf16 and int8)."""
    return simd_level(lib) >= 3


def has_bf16_dot(lib) -> bool:
    return simd_level(lib) >= 4


@lru_cache(maxsize=None)
def has_amx(lib) -> bool:
    """Whether prompts run as AMX tile multiplies (``jneox_prompt_amx``): built with AMX, and the OS lets
    this process use the tile registers (Linux 5.16+)."""
    return simd_level(lib) >= 5 and lib.jneox_amx() == 1


def decode_attention(lib, qkv, cos, sin, k_cache, v_cache, pos, heads: int, head_dim: int):
    """Attention of T new tokens per row against the cache (see jneox_decode_attention in gemv.c);
    returns (B, T, H*D).

    ``qkv`` (B, T, 3*H*D) fp32; ``cos``/``sin`` (T, R) shared by the rows or (B, T, R); caches
    (B', H, S, D) fp32 contiguous; ``pos`` (B,) int64: the position of each row's first new token
    (the others follow it).
    """
    import torch

    B, T = qkv.shape[:2]
    S = k_cache.shape[2]
    out = torch.empty(B, T, heads * head_dim, dtype=torch.float32)
    scratch = torch.empty(B * heads * (S + head_dim), dtype=torch.float32)
    R = cos.shape[-1]
    cs_b = 0 if cos.dim() == 2 else T * R
    lib.jneox_decode_attention(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), R, cs_b, R,
                               k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr(), B, T, heads, S, head_dim,
                               out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return out
