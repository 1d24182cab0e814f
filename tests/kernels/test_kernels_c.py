"""The kernels' linear entry points checked by a stand-alone C program (tests/kernels/check_kernels.c):
natively at every JNEOX_SIMD level of jneox.kernels.paths this CPU has (built as the loader builds them:
-march=native and the level's caps), and as 64-bit ARM (NEON and portable) under qemu-user with Debian's
cross compiler, since these machines are x86."""
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jneox import kernels
from jneox.kernels import paths
from jneox.kernels.build import CSRC, SOURCE

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [str(ROOT / "tests" / "kernels" / "check_kernels.c"), str(SOURCE)]
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wno-unknown-pragmas", f"-I{CSRC}"]


def _require(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        why = f"{', '.join(missing)} not installed (Debian: gcc-aarch64-linux-gnu qemu-user)"
        if os.environ.get("CI") == "true":
            pytest.fail(why + "; .ci/run installs them")
        pytest.skip(why)


def _run(cmd, tmp_path, flags, runner=()):
    exe = tmp_path / "check"
    subprocess.run([cmd, *CFLAGS, *flags, *SOURCES, "-lm", "-o", str(exe)], check=True, capture_output=True, text=True)
    out = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == 5, out.stdout
    return out.stdout.splitlines()[0]


@pytest.mark.parametrize("level", [None, *paths.levels()], ids=lambda v: v or "native")
def test_x86_kernels(tmp_path, level):
    _require("cc")
    if not kernels.simd_forcible():
        pytest.skip("JNEOX_SIMD levels are x86-64 builds")
    path = paths.BY_LEVEL.get(level)
    missing = [f for f in path.cpu_flags if not kernels.cpu_has(f)] if path else []
    if missing:
        pytest.skip(f"this CPU lacks {' '.join(missing)} for {level}")
    first = _run("cc", tmp_path, ["-march=native", *(paths.cap_flags(level) if level else [])])
    if path is not None:
        assert first == f"kernels built at SIMD level {path.simd}"


@pytest.mark.parametrize("flags, level", [(["-march=armv8-a"], "neon"), (["-march=armv8-a+nosimd"], "portable")],
                         ids=["neon", "portable"])
def test_arm64_kernels_under_qemu(tmp_path, flags, level):
    _require("aarch64-linux-gnu-gcc", "qemu-aarch64")
    assert _run("aarch64-linux-gnu-gcc", tmp_path, [*flags, "-static"], ["qemu-aarch64"]) == \
        f"kernels built at SIMD level {paths.BY_LEVEL[level].simd}"


def test_a_compiler_without_openmp_still_builds_the_kernels(tmp_path, monkeypatch):
    """Apple's clang refuses -fopenmp: the kernels are built without it (one thread), with a warning."""
    _require("cc")
    fake = tmp_path / "cc-without-openmp"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && { echo 'unsupported option' >&2; exit 1; }; "
                    "done\nexec cc \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("JNEOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("JNEOX_OPENMP", raising=False)
    with pytest.warns(UserWarning, match="one thread"):
        path = kernels.build(str(fake))
    assert ctypes.CDLL(str(path)).jneox_kernels_simd() >= 0
    with pytest.raises(RuntimeError, match="compiling jneox.c failed"):  # a broken compiler still says so
        kernels.build(f"{sys.executable} -c 'raise SystemExit(1)'")
