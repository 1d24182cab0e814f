"""Native weight-only linear kernels for CPU decoding, compiled once per machine on first use.

``csrc/`` is plain C with intrinsics, one file per architecture (x86.c: AVX2/AVX-512; arm.c: NEON;
generic.c: portable reference loops; amx.c: AMX prompt tiles) and per concern (linear.c, prompt.c,
attention.c), built as one compilation unit (jneox.c) with the system C compiler (``cc -O3 -march=native
-fopenmp``, see :mod:`.build`) into a cache folder and loaded with ctypes after torch, so it shares
torch's OpenMP runtime. Without a compiler, or with ``JNEOX_KERNELS=0``, :func:`library` returns None and
jneox uses PyTorch's own ops instead (correct, slower).

``JNEOX_SIMD=portable|avx2|avx2vnni|avx512|avx512bf16|amx`` builds the kernels for at most that
instruction set (on x86-64; never more than the CPU has), so that every path can be run and tested on
one machine; :mod:`.paths` says which path needs what.

Every call into the library goes through this module: the signatures are declared here, and the
functions below take tensors and pass their addresses, so no other module touches ctypes.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import threading
import time
import warnings
from functools import lru_cache

import torch

from ..errors import UsageError
from .build import build, cache_dir, cpu_has, simd_forcible  # noqa: F401  (the package's API)
from .paths import FORMATS, SIMD_LEVELS, Format  # noqa: F401

P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
# rows the kernels take as one decode batch, each row's bits the same alone or among others: decode
# steps, the server's batches, speculative checks (quantize.py sends longer inputs to the prompt paths;
# model.py's fused attention takes up to this many new tokens per row)
MAX_KERNEL_ROWS = 16
# name -> (argument types, result type), as in csrc/jneox.h (enum jneox_format passes as an int)
SIGNATURES = {
    "jneox_linear_f32": ([P, P, P, P, I, I, I, I], None),
    "jneox_linear_bf16": ([P, P, P, P, I, I, I, I], None),
    "jneox_linear_int8": ([P, P, P, P, P, I, I, I, P, I], None),
    "jneox_linear_int4": ([P, P, P, P, P, I, I, I, I, P, I], None),
    "jneox_decode_attention": ([P, P, P, I, I, I, P, P, P, I, I, I, I, I, P, P, I], None),
    "jneox_kernels_simd": ([], ctypes.c_int),
    "jneox_kernels_int8_dot": ([], ctypes.c_int),
    "jneox_prompt_bf16": ([P, P, P, P, I, I, I, I], None),
    "jneox_prompt_int8": ([P, P, P, P, P, I, I, I, I], None),
    "jneox_prompt_fma": ([I, P, P, P, P, I, I, I, P, I], None),
    "jneox_prompt_fma_scratch": ([I, I, I], ctypes.c_long),
    "jneox_read_bytes": ([P, ctypes.c_long, I], ctypes.c_uint64),
    "jneox_unpack_rows": ([I, P, P, I, I, I, I, P, I, I], None),
    "jneox_amx": ([], ctypes.c_int),
    "jneox_prompt_amx": ([I, P, P, P, P, P, I, I, I, I, P, I], None),
    "jneox_prompt_amx_scratch": ([I, I, I, I], ctypes.c_long),
    "jneox_jsonl_texts": ([P, L, P, L, I, P, L, P], L),
}


def requested_simd() -> str | None:
    """The level ``JNEOX_SIMD`` asks for (None: whatever the CPU has)."""
    level = os.environ.get("JNEOX_SIMD", "").strip().lower() or None
    if level not in (None, "native") and level not in SIMD_LEVELS:
        raise UsageError(f"JNEOX_SIMD={level!r}: expected one of native, {', '.join(SIMD_LEVELS)}")
    return None if level == "native" else level


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
    # torch is imported above, so its libgomp is loaded first and the kernels share its thread pool
    try:
        path = build(level=level)  # checked against its recorded hash, else rebuilt
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"jneox: native CPU kernels unavailable, using PyTorch ops instead ({e})", stacklevel=3)
        return None
    if path.parent != cache_dir():  # built in a private temporary folder: loaded, so no longer needed
        shutil.rmtree(path.parent, ignore_errors=True)
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


@lru_cache(maxsize=None)
def simd_level(lib) -> int:
    """What the library was built with (``jneox_kernels_simd``): the ``simd`` column of :mod:`.paths`."""
    return lib.jneox_kernels_simd()


@lru_cache(maxsize=None)
def int8_dot(lib) -> str:
    """How the int8 kernel multiplies (``jneox_kernels_int8_dot``): "vnni" (dpbusd: AVX512-VNNI or
    AVX-VNNI), "avx2" (maddubs/madd), "neon" or "scalar"; every one on int8-rounded activations."""
    return ("scalar", "neon", "avx2", "vnni")[lib.jneox_kernels_int8_dot()]


def has_batch_path(lib) -> bool:
    """Whether the kernels take prompts too, in chunks of PREFILL_CHUNK rows (AVX-512). Decode batches of
    up to 16 rows take several rows per pass at every level (AVX2: 3 in fp32, 4 in bf16 and int8)."""
    return simd_level(lib) >= SIMD_LEVELS["avx512"]


def has_bf16_dot(lib) -> bool:
    return simd_level(lib) >= SIMD_LEVELS["avx512bf16"]


@lru_cache(maxsize=None)
def has_amx(lib) -> bool:
    """Whether prompts run as AMX tile multiplies (``jneox_prompt_amx``): built with AMX, and the OS lets
    this process use the tile registers (Linux 5.16+)."""
    return simd_level(lib) >= SIMD_LEVELS["amx"] and lib.jneox_amx() == 1


# ---- calls: tensors in, addresses to the C API --------------------------------------------------------
_SCRATCH = threading.local()


def scratch(nbytes: int) -> int:
    """The address of a scratch buffer of at least ``nbytes`` for the int8/int4 kernels' activations rounded
    to int8, the AMX kernel's tiles and the JSONL scanner's texts. One buffer per thread, shared by every layer (each kernel call is
    done with it when it returns): one per layer would hold 144 of them in a 3.6B model."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < nbytes:
        _SCRATCH.buf = buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf.data_ptr()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(lib, fmt: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
           bias: torch.Tensor | None, y: torch.Tensor, group_size: int, threads: int) -> None:
    """Decode rows (at most MAX_KERNEL_ROWS): y (M, N) = x (M, K) fp32 times the packed ``weight`` in
    ``fmt`` (N its padded output rows), plus ``bias`` (N) if given; ``scale`` for int8 and int4."""
    m, k = x.shape
    n = y.shape[1]
    args = (x.data_ptr(), weight.data_ptr())
    if fmt == "float32":
        lib.jneox_linear_f32(*args, _ptr(bias), y.data_ptr(), m, n, k, threads)
    elif fmt == "bfloat16":
        lib.jneox_linear_bf16(*args, _ptr(bias), y.data_ptr(), m, n, k, threads)
    elif fmt == "int8":
        lib.jneox_linear_int8(*args, scale.data_ptr(), _ptr(bias), y.data_ptr(), m, n, k,
                              scratch(2 * m * k + 12 * m * (k // 8)), threads)
    else:
        lib.jneox_linear_int4(*args, scale.data_ptr(), _ptr(bias), y.data_ptr(), m, n, k, group_size,
                              scratch(m * k + 12 * m * (k // group_size)), threads)


def prompt_bf16_dot(lib, fmt: str, xb: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                    bias: torch.Tensor | None, y: torch.Tensor, threads: int) -> None:
    """A prompt with bf16 dot products (:func:`has_bf16_dot`; bf16 and int8 weights): ``xb`` (M, K) bf16."""
    m, k = xb.shape
    n = y.shape[1]
    if fmt == "bfloat16":
        lib.jneox_prompt_bf16(xb.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), m, n, k, threads)
    else:
        lib.jneox_prompt_int8(xb.data_ptr(), weight.data_ptr(), scale.data_ptr(), _ptr(bias), y.data_ptr(),
                              m, n, k, threads)


def prompt_fma(lib, fmt: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
               threads: int) -> None:
    """A prompt with fp32 FMA blocks (:func:`has_batch_path`; fp32 and bf16 weights): y (M, N) from x (M, K) fp32."""
    m, k = x.shape
    n = y.shape[1]
    lib.jneox_prompt_fma(Format[fmt], x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), m, n, k,
                         scratch(lib.jneox_prompt_fma_scratch(m, k, threads)), threads)


def prompt_amx(lib, fmt: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
               bias: torch.Tensor | None, y: torch.Tensor, group_size: int, threads: int) -> None:
    """A prompt as AMX tile multiplies (:func:`has_amx`): y (M, N) from x (M, K) fp32."""
    m, k = x.shape
    n = y.shape[1]
    lib.jneox_prompt_amx(Format[fmt], x.data_ptr(), weight.data_ptr(), _ptr(scale), _ptr(bias), y.data_ptr(),
                         m, n, k, group_size, scratch(lib.jneox_prompt_amx_scratch(m, n, k, threads)), threads)


def unpack_rows(lib, fmt: str, weight: torch.Tensor, scale: torch.Tensor | None, k: int, group_size: int,
                t0: int, t1: int, out: torch.Tensor, threads: int) -> None:
    """Tiles t0..t1-1 of the packed ``weight`` as plain rows into ``out`` (bf16 or fp32; int8 unscaled,
    int4 times ``scale``)."""
    lib.jneox_unpack_rows(Format[fmt], weight.data_ptr(), _ptr(scale), k, group_size, t0, t1, out.data_ptr(),
                          int(out.dtype == torch.bfloat16), threads)


def read_bandwidth(lib, buf: torch.Tensor, threads: int, repeats: int = 3) -> float:
    """The memory's read bandwidth in GB/s: the fastest of ``repeats`` reads of ``buf`` (64-byte aligned, whole
    lines: a large buffer) by ``jneox_read_bytes``, vector loads from ``threads`` threads."""
    nbytes = buf.numel() * buf.element_size() // 64 * 64
    if buf.data_ptr() % 64:
        raise ValueError("read_bandwidth: the buffer must be 64-byte aligned")
    lib.jneox_read_bytes(buf.data_ptr(), nbytes, threads)  # pages in, threads started
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        lib.jneox_read_bytes(buf.data_ptr(), nbytes, threads)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def decode_attention(lib, qkv, cos, sin, k_cache, v_cache, pos, heads: int, head_dim: int):
    """Attention of T new tokens per row against the cache (``jneox_decode_attention``); returns (B, T, H*D).

    ``qkv`` (B, T, 3*H*D) fp32; ``cos``/``sin`` (T, R) shared by the rows or (B, T, R); caches
    (B', H, S, D) fp32 contiguous; ``pos`` (B,) int64: the position of each row's first new token
    (the others follow it).
    """
    B, T = qkv.shape[:2]
    S = k_cache.shape[2]
    out = torch.empty(B, T, heads * head_dim, dtype=torch.float32)
    buf = torch.empty(B * heads * (S + head_dim), dtype=torch.float32)
    R = cos.shape[-1]
    cs_b = 0 if cos.dim() == 2 else T * R
    lib.jneox_decode_attention(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), R, cs_b, R,
                               k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr(), B, T, heads, S, head_dim,
                               out.data_ptr(), buf.data_ptr(), torch.get_num_threads())
    return out


def jsonl_texts(lib, data: bytes, field: str, newlines: bool) -> list[bytes] | None:
    """The ``field`` string of every line of ``data`` (whole JSONL lines) as the UTF-8 bytes the tokenizer
    encodes (``jneox_jsonl_texts``): newlines as ``<NL>`` when ``newlines`` (a "\\r\\n" as one), else a
    text with a newline is not taken. None where the scanner does not take the chunk: a line blank or not
    plainly a JSON object with that string field (csrc/jsonl.c lists what it takes); read it in Python."""
    try:
        key = field.encode("utf-8")
    except UnicodeEncodeError:
        return None
    cap = 2 * len(data) + 1  # an escape writes at most twice its length ("\\n" -> "<NL>"), plus the '\n' after each text
    out, written = scratch(cap), ctypes.c_long()
    if lib.jneox_jsonl_texts(data, len(data), key, len(key), int(newlines), out, cap, ctypes.byref(written)) < 0:
        return None
    texts = ctypes.string_at(out, written.value).split(b"\n")
    texts.pop()  # after the '\n' ending the last text
    return texts
