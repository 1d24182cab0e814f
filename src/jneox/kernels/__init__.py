"""Native weight-only linear kernels for CPU decoding, compiled once per machine on first use.

``gemv.c`` is plain C with AVX2/FMA intrinsics, an AVX-512 path for decode batches, and portable C
where the CPU lacks them, built with the system C compiler (``cc -O3 -march=native -fopenmp``) into
a cache folder and loaded with ctypes after torch, so it shares torch's OpenMP runtime. Without a
compiler, or with ``JNEOX_KERNELS=0``, :func:`library` returns None and jneox uses PyTorch's own ops
instead (correct, slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
LIBS = ["-lm"]
P, I = ctypes.c_void_p, ctypes.c_int
SIGNATURES = {
    "jneox_linear_f32": [P, P, P, P, I, I, I, I],
    "jneox_linear_bf16": [P, P, P, P, I, I, I, I],
    "jneox_linear_int8": [P, P, P, P, P, I, I, I, I],
    "jneox_linear_int4": [P, P, P, P, P, I, I, I, I, P, I],
    "jneox_decode_attention": [P, P, P, I, I, P, P, P, I, I, I, I, P, P, I],
    "jneox_kernels_simd": [],
    "jneox_prompt_bf16": [P, P, P, P, I, I, I, I],
    "jneox_prompt_int8": [P, P, P, P, P, I, I, I, I],
}


def cache_dir() -> Path:
    base = os.environ.get("JNEOX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "jneox")
    return Path(base).expanduser()


def _cpu_id() -> str:
    """-march=native code is only valid on the CPU it was built for: key the build by its flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(compiler: str | None = None) -> Path:
    """Compile gemv.c (if not already built for this source, compiler flags and CPU) and return the .so path."""
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + LIBS).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / f"gemv-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr.strip()}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (kernels disabled or not buildable: PyTorch fallback)."""
    if os.environ.get("JNEOX_KERNELS", "1") == "0":
        return None
    import torch  # noqa: F401  (load torch's libgomp first so the kernels share its thread pool)

    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"jneox: native CPU kernels unavailable, using PyTorch ops instead ({e})", stacklevel=2)
        return None
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int if name == "jneox_kernels_simd" else None
    return lib


@lru_cache(maxsize=None)
def simd_level(lib) -> int:
    """What the library was built with (``jneox_kernels_simd`` in gemv.c): 0 portable, 2 AVX2/FMA,
    3 AVX-512 (8 rows per pass for batches), 4 AVX-512 BF16 (also the bf16/int8 prompt kernels)."""
    return lib.jneox_kernels_simd()


def has_batch_path(lib) -> bool:
    return simd_level(lib) >= 3


def has_bf16_dot(lib) -> bool:
    return simd_level(lib) >= 4


def decode_attention(lib, qkv, cos, sin, k_cache, v_cache, pos, heads: int, head_dim: int):
    """Single-token attention for every row (see jneox_decode_attention in gemv.c); returns (B, H*D).

    ``qkv`` (B, 3*H*D) fp32, ``cos``/``sin`` (B or 1, R), caches (B', H, S, D) fp32 contiguous,
    ``pos`` (B,) int64: the position of each row's new token.
    """
    import torch

    B = qkv.shape[0]
    S = k_cache.shape[2]
    out = torch.empty(B, heads * head_dim, dtype=torch.float32)
    scratch = torch.empty(B * heads * (S + head_dim), dtype=torch.float32)
    cs_stride = 0 if cos.shape[0] == 1 else cos.shape[-1]
    lib.jneox_decode_attention(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[-1], cs_stride,
                               k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr(), B, heads, S, head_dim,
                               out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return out
