"""The kernels' paths: the one table of what each build level runs and what it needs.

The loader's level choice and caps (``JNEOX_SIMD``, :data:`SIMD_LEVELS`, :func:`cap_flags`), the tests'
parametrisation over levels, and the table in docs/kernels.md (:func:`markdown_table`) are all made from
:data:`PATHS`. ``python -m jneox.kernels.paths`` prints the table; ``python -m jneox.kernels.paths --update
docs/kernels.md`` rewrites the docs' copy.

A level caps the instruction sets the kernels are built for: ``-march=native`` plus ``-mno-*`` flags, so
one x86-64 machine can build and test every path it has. 64-bit ARM builds NEON with ``-march=native``
and cannot be capped (tests/kernels/test_kernels_c.py runs it under qemu).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path


class Format(IntEnum):
    """The weight formats as the C API numbers them (``enum jneox_format`` in csrc/jneox.h; a test holds
    the two equal), in the order of jneox.quantize.FORMATS."""

    float32 = 0
    bfloat16 = 1
    int8 = 2
    int4 = 3


FORMATS = tuple(Format.__members__)


@dataclass(frozen=True)
class KernelPath:
    level: str  # the JNEOX_SIMD value (x86-64) or the architecture's name
    simd: int  # what jneox_kernels_simd() returns for a build at this level
    arch: str  # "x86_64" or "aarch64"
    cpu_flags: tuple[str, ...]  # the /proc/cpuinfo flags it needs
    cap: tuple[str, ...]  # the compiler flags that hold -march=native to this level (x86-64)
    formats: tuple[str, ...]  # the weight formats its own paths take
    prompt_kernels: bool  # prompts (> 16 rows) run on the kernels' own prompt paths, not on PyTorch's GEMM
    does: str  # what it runs, in short

    @property
    def forcible(self) -> bool:
        """Whether ``JNEOX_SIMD`` can select it (x86-64 levels)."""
        return self.arch == "x86_64"


_NO_AMX = ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")

PATHS = (
    KernelPath("portable", 0, "x86_64", (), ("-mno-avx", "-mno-avx2", "-mno-fma", "-mno-f16c"), FORMATS, False,
               "scalar loops, 1-2 rows per pass; int4 in fp32, int8 in scalar integers; prompts: "
               "jneox_unpack_rows + PyTorch's GEMM"),
    KernelPath("avx2", 2, "x86_64", ("avx2", "fma", "f16c"), ("-mno-avx512f", "-mno-avxvnni"), FORMATS, False,
               "8-wide FMA tiles, 3 (fp32) / 4 (bf16, int8) rows per pass; int8 and int4 (groups of 64) in "
               "integers (vpmaddubsw/vpmaddwd); prompts as portable"),
    KernelPath("avx2vnni", 2, "x86_64", ("avx2", "fma", "f16c", "avx_vnni"), ("-mno-avx512f",), ("int8",), False,
               "avx2, with int8 dot products by vpdpbusd (AVX-VNNI); the avx2 level builds without it"),
    KernelPath("avx512", 3, "x86_64", ("avx512f",), ("-mno-avx512bf16", *_NO_AMX), FORMATS, True,
               "+ 8 rows per pass for batches of 3+ rows (int8: vpdpbusd where avx512_vnni + avx512vl); int4 "
               "(groups of 64) two output rows per register (avx512bw; vpdpbusd where avx512_vnni, high nibbles by "
               "vgf2p8affineqb where gfni); prompts in "
               "chunks of 128 rows, bf16 as fp32 FMA blocks on the weight widened per block (jneox_prompt_fma)"),
    KernelPath("avx512bf16", 4, "x86_64", ("avx512f", "avx512_bf16"), _NO_AMX, ("bfloat16", "int8"), True,
               "+ bf16/int8 prompts with bf16 dot products (vdpbf16ps)"),
    KernelPath("amx", 5, "x86_64", ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16"), (),
               ("bfloat16", "int8", "int4"), True,
               "+ prompts as AMX tile multiplies on the packed weight (jneox_prompt_amx; Linux 5.16+): bf16 "
               "tiles, int8 tiles (amx_int8) for int8 with K % 64 == 0 and int4 in groups of 64"),
    KernelPath("neon", 1, "aarch64", ("asimd",), (), FORMATS, False,
               "2 x 4-lane FMAs per 8 weights, 1-2 rows per pass; int8 with vmull_s8/vpadalq_s16, 4 rows per "
               "pass; prompts as portable"),
)
BY_LEVEL = {p.level: p for p in PATHS}
MARKERS = ("<!-- paths-table:start -->", "<!-- paths-table:end -->")  # where docs/kernels.md shows the table
# JNEOX_SIMD level -> what jneox_kernels_simd() returns there
SIMD_LEVELS = {p.level: p.simd for p in PATHS if p.forcible}


def levels(*, prompt_kernels: bool | None = None) -> list[str]:
    """The JNEOX_SIMD levels (x86-64), lowest first; only those with (or without) prompt kernels if asked."""
    return [p.level for p in PATHS if p.forcible and prompt_kernels in (None, p.prompt_kernels)]


def cap_flags(level: str) -> list[str]:
    """The compiler flags that hold ``-march=native`` to ``level``."""
    return list(BY_LEVEL[level].cap)


def markdown_table() -> str:
    """The table of paths as markdown, as docs/kernels.md shows it."""
    rows = ["| JNEOX_SIMD | simd() | CPU flags needed | formats | what it runs |",
            "|---|---|---|---|---|"]
    for p in PATHS:
        level = f"`{p.level}`" if p.forcible else f"({p.arch}: {p.level})"
        flags = " ".join(f"`{f}`" for f in p.cpu_flags) or "none"
        rows.append(f"| {level} | {p.simd} | {flags} | {', '.join(p.formats)} | {p.does} |")
    return "\n".join(rows) + "\n"


def update(doc: Path) -> None:
    """Replace the table between the markers of ``doc`` (docs/kernels.md) with :func:`markdown_table`."""
    text = doc.read_text(encoding="utf-8")
    head, found, rest = text.partition(MARKERS[0] + "\n")
    _, found_end, tail = rest.partition(MARKERS[1])
    if not (found and found_end):
        raise SystemExit(f"{doc}: no {MARKERS[0]} ... {MARKERS[1]} lines to put the table between")
    doc.write_text(head + MARKERS[0] + "\n" + markdown_table() + MARKERS[1] + tail, encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the kernels' table of paths as markdown.")
    parser.add_argument("--update", type=Path, metavar="DOC",
                        help="write it between the paths-table markers of DOC (docs/kernels.md) instead")
    args = parser.parse_args()
    if args.update:
        update(args.update)
    else:
        print(markdown_table(), end="")
