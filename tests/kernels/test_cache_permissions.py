"""The kernel cache cannot be used to plant code: private, owner and mode checked, CC a word list."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


# ---- the kernel cache cannot be used to plant code ----------------------------------------
@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty JNEOX_CACHE for this test (a fresh build, ~10 s), with the system compiler."""
    import shutil

    from jneox import kernels

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    monkeypatch.setenv("JNEOX_CACHE", str(tmp_path / "cache" / "jneox"))
    monkeypatch.delenv("CC", raising=False)
    return kernels


def _valid_library(path: Path) -> bool:
    """A compiled shared object (checked by its header: not loaded here, since a test rewrites the file)."""
    return path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size > 10_000


def _plant(path: Path, mode: int) -> None:
    planted = path.with_name("planted")
    planted.write_bytes(b"planted")
    planted.chmod(mode)
    os.replace(planted, path)


def test_kernel_cache_is_private_and_a_planted_library_is_rebuilt(private_cache, tmp_path):
    kernels = private_cache
    so = kernels.build()
    assert so.parent == kernels.cache_dir() and kernels.cache_dir().stat().st_mode & 0o777 == 0o700
    assert so.stat().st_mode & 0o022 == 0 and _valid_library(so)
    _plant(so, 0o666)  # what another user could do to a file anyone may write
    again = kernels.build()
    assert again == so and so.read_bytes() != b"planted" and so.stat().st_mode & 0o022 == 0 and _valid_library(so)
    if os.getuid() == 0:  # root can hand the file to another user: a file not ours is rebuilt too
        _plant(so, 0o755)
        os.chown(so, 12345, 12345)
        assert kernels.build() == so and so.read_bytes() != b"planted" and so.stat().st_uid == 0


def test_a_cache_others_may_write_is_not_used(private_cache):
    kernels = private_cache
    shared = kernels.cache_dir()
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    with pytest.warns(UserWarning, match="may be written by others"):
        so = kernels.build()
    assert so.parent != shared and not list(shared.iterdir()) and _valid_library(so)


def test_cc_is_a_shell_word_list(private_cache, monkeypatch):
    """CC="ccache gcc" (here: "gcc -DJNEOX_TEST=1") is a command and its arguments, not one file name."""
    import shutil

    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -DJNEOX_TEST=1")
    assert _valid_library(private_cache.build())
