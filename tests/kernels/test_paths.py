"""jneox.kernels.paths is the one table of the kernels' paths: the C header, the docs and the loader agree
with it."""
import re
import subprocess
import sys
from pathlib import Path

from jneox import kernels, quantize
from jneox.kernels import paths
from jneox.kernels.build import CSRC

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "python -m jneox.kernels.paths --update docs/kernels.md"


def _header_enum() -> dict[str, int]:
    """``enum jneox_format`` of csrc/jneox.h as {lower-case name without the prefix: value}."""
    text = (CSRC / "jneox.h").read_text()
    body = re.search(r"enum jneox_format\s*\{(.*?)\}", text, re.S).group(1)
    return {name.lower(): int(value) for name, value in re.findall(r"JNEOX_(\w+)\s*=\s*(\d+)", body)}


def test_the_format_enum_is_the_headers():
    assert _header_enum() == {f.name: f.value for f in paths.Format}
    assert tuple(paths.Format.__members__) == quantize.FORMATS  # the order PackedLinear's formats are named in


def test_docs_show_the_table_of_paths():
    doc = ROOT / "docs" / "kernels.md"
    assert doc.is_file(), "docs/kernels.md is missing"
    text = doc.read_text()
    start, end = paths.MARKERS[0] + "\n", paths.MARKERS[1]
    assert start in text and end in text, f"docs/kernels.md lacks the markers {start.strip()} ... {end}"
    shown = text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"
    assert shown == paths.markdown_table(), f"docs/kernels.md's table is stale: run `{REGENERATE}`"


def test_the_module_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "jneox.kernels.paths"], capture_output=True, text=True, check=True)
    assert out.stdout == paths.markdown_table()
    assert out.stdout.count("\n") == len(paths.PATHS) + 2


def test_update_rewrites_only_the_table(tmp_path):
    doc = tmp_path / "kernels.md"
    doc.write_text(f"# Kernels\n\nbefore\n{paths.MARKERS[0]}\n| old |\n{paths.MARKERS[1]}\nafter\n")
    subprocess.run([sys.executable, "-m", "jneox.kernels.paths", "--update", str(doc)], check=True)
    assert doc.read_text() == (f"# Kernels\n\nbefore\n{paths.MARKERS[0]}\n{paths.markdown_table()}"
                               f"{paths.MARKERS[1]}\nafter\n")


def test_the_loader_takes_its_levels_from_the_table():
    assert kernels.SIMD_LEVELS == {p.level: p.simd for p in paths.PATHS if p.arch == "x86_64"}
    assert paths.levels() == ["portable", "avx2", "avx2vnni", "avx512", "avx512bf16", "amx"]
    assert paths.levels(prompt_kernels=True) == ["avx512", "avx512bf16", "amx"]
    simd = [paths.BY_LEVEL[level].simd for level in paths.levels()]
    assert simd == sorted(simd)  # lowest first: a cap never adds an instruction set


def test_every_c_function_has_a_signature():
    """Every function jneox.h declares is declared to ctypes too, with as many arguments, and nothing else."""
    header = (CSRC / "jneox.h").read_text()
    declared = {name: 0 if params.strip() == "void" else params.count(",") + 1
                for name, params in re.findall(r"^(?:void|int|long|uint64_t)\s+(jneox_\w+)\(([^)]*)\);", header, re.M)}
    assert declared == {name: len(args) for name, (args, _) in kernels.SIGNATURES.items()}
