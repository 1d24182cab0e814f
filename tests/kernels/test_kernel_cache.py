"""A damaged kernel library in the cache is rebuilt, not loaded; a killed build leaves nothing behind.

The loads run in a subprocess: loading a truncated or corrupted library can kill the process (SIGBUS,
SIGILL), which must fail the test, not pytest."""
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jneox import kernels
from jneox.kernels.build import TEMP_PREFIX, file_hash

# the module (jneox.kernels.build, the attribute, is its build function)
build_module = importlib.import_module("jneox.kernels.build")

# loads the kernels as every command does, and checks one product against PyTorch
LOAD = """
import warnings
warnings.simplefilter("error")  # the PyTorch fallback's warning fails this too
import torch
from torch import nn
from jneox import kernels
from jneox.quantize import PackedLinear
lib = kernels.library()
assert lib is not None
torch.manual_seed(0)
lin = nn.Linear(64, 8)
packed = PackedLinear.from_linear(lin, "float32")
x = torch.randn(2, 64)
with torch.no_grad():
    torch.testing.assert_close(packed._kernel(lib, x), lin(x))
print("ok", kernels.simd_level(lib))
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    folder = tmp_path / "cache"
    monkeypatch.setenv("JNEOX_CACHE", str(folder))
    for name in ("CC", "JNEOX_SIMD", "JNEOX_KERNELS", "JNEOX_OPENMP"):
        monkeypatch.delenv(name, raising=False)
    return folder


def _load_in_subprocess():
    proc = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("ok"), proc.stdout


def _truncate(data: bytes, size: int) -> bytes:
    return data[:size]


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


@pytest.mark.parametrize("damage", [lambda d: _truncate(d, 0), lambda d: _truncate(d, 100),
                                    lambda d: _truncate(d, len(d) // 2), _flip],
                         ids=["empty", "100-bytes", "half", "flipped"])
def test_a_damaged_library_is_rebuilt(cache, damage):
    so = kernels.build()
    good = so.read_bytes()
    damaged = damage(good)
    so.write_bytes(damaged)  # in place: owner and mode stay, only the bytes change
    _load_in_subprocess()
    assert so.read_bytes() != damaged
    assert (so.parent / (so.name + ".sha256")).read_text().strip() == file_hash(so)
    assert so.stat().st_mode & 0o777 == 0o700 and cache.stat().st_mode & 0o777 == 0o700


def test_a_killed_build_leaves_nothing_behind(cache, tmp_path):
    """A compiler killed halfway leaves a partial file; the next build removes it (and keeps the files of
    a build still running)."""
    stuck = tmp_path / "stuck-cc"  # writes part of its output, then hangs until killed
    stuck.write_text('#!/bin/sh\nwhile [ "$#" -gt 0 ]; do [ "$1" = -o ] && { echo partial > "$2"; }; shift; done\n'
                     "sleep 600\n")
    stuck.chmod(0o755)
    build = subprocess.Popen([sys.executable, "-c", f"from jneox import kernels; kernels.build({str(stuck)!r})"],
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(p.read_bytes() == b"partial\n" for p in cache.glob("*") if p.is_file()):
            assert build.poll() is None and time.monotonic() < deadline, "the stuck build never started writing"
            time.sleep(0.2)
    finally:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait()
    assert [p.name for p in cache.iterdir()]  # the killed build's partial output is there ...
    running = cache / f"{TEMP_PREFIX}{os.getpid()}-inprogress.so"  # a live build's file (this process is alive)
    running.write_bytes(b"in progress")
    so = kernels.build()
    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted([so.name, so.name + ".sha256", running.name])  # ... and gone after the next build
    _load_in_subprocess()


def test_the_build_key_covers_every_source_file(tmp_path, monkeypatch):
    """A change to any file of csrc/ (a header included by the unity file too) builds a new library."""
    copy = tmp_path / "csrc"
    shutil.copytree(build_module.CSRC, copy)
    monkeypatch.setattr(build_module, "CSRC", copy)
    command, flags = ["cc"], list(build_module.FLAGS)
    before = build_module._key(command, flags)
    assert len(build_module.sources()) == len(list(copy.glob("*.[ch]"))) > 2
    for src in build_module.sources():
        original = src.read_bytes()
        src.write_bytes(original + b"\n")
        assert build_module._key(command, flags) != before, src.name
        src.write_bytes(original)
    assert build_module._key(command, flags) == before
