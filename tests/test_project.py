"""The project as a whole: the suite runs under plain pytest, and the dependency floors cover the code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


# ---- the suite runs under plain `pytest` too, not only `python -m pytest` -----------------
def test_the_suite_imports_under_plain_pytest(tmp_path):
    """`python -m pytest` puts the current folder on sys.path, plain `pytest` does not: a test that
    imports `tests.conftest` fails there. Run one such test (a tokenizer CLI test) the plain way."""
    import subprocess
    import sys

    pytest_bin = Path(sys.executable).with_name("pytest")
    if not pytest_bin.is_file():
        pytest.skip(f"no pytest script beside {sys.executable}")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(pytest_bin), "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
                          "tests/train/test_train_data.py", "-k", "train_tokenizer_cli_has_the_card_options"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-2000:]


# ---- the dependency floors are versions that have what jneox uses ----------------------------
def test_dependency_floors_cover_what_the_code_uses():
    """First versions with what jneox calls: torch.distributed.fsdp.fully_shard (torch 2.6),
    huggingface_hub.errors and the `hf` command named in error messages (huggingface_hub 0.34),
    an SPDX `license = "MIT"` (setuptools 77), GPTNeoXConfig(rope_parameters=) in the tests (transformers 5)."""
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    floors = {}
    for req in (project["build-system"]["requires"] + project["project"]["dependencies"]
                + project["project"]["optional-dependencies"]["test"]):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", req)
        if m:
            floors[m[1].lower().replace("_", "-")] = Version(m[2])
    needed = {"torch": "2.6", "huggingface-hub": "0.34", "setuptools": "77", "transformers": "5"}
    for name, version in needed.items():
        assert floors[name] >= Version(version), f"{name}>={floors[name]} in pyproject.toml; jneox needs {version}"
