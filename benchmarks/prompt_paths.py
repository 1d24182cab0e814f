"""The prompt paths one CPU could take for a weight format, at the 3.6B linear shapes, head to head.

For each of a 3.6B layer's four linears (128 prompt rows), times the paths in turn in one process
and prints GFLOP/s (the fastest of ``--repeats``): the decode tiles (``jneox_linear_*``, 8 rows per
pass on AVX-512), ``jneox_prompt_fma`` (AVX-512 fp32 FMA blocks; fp32 and bf16 weights), and
PyTorch's GEMM on blocks unpacked by ``jneox_unpack_rows`` (``PackedLinear._gemm_blocks``: MKL's
sgemm, or oneDNN's bf16 matmul where the CPU has bf16 in hardware). With one thread it reports CPU
time, which a shared machine disturbs less than wall time.

    OMP_NUM_THREADS=1 python benchmarks/prompt_paths.py --format bfloat16

An AVX-512 CPU without AVX512-BF16 and AMX, emulated on a newer one:

    JNEOX_SIMD=avx512 MKL_ENABLE_INSTRUCTIONS=AVX512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI \\
        OMP_NUM_THREADS=1 python benchmarks/prompt_paths.py --format bfloat16
"""
from __future__ import annotations

import argparse
import time

import torch

from jneox import kernels, quantize
from jneox.quantize import PackedLinear

SHAPES = [(8448, 2816), (2816, 2816), (11264, 2816), (2816, 11264)]  # (out, in): qkv, dense, mlp up, mlp down


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", default="bfloat16", choices=quantize.FORMATS)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    lib = kernels.library()
    if lib is None:
        raise SystemExit("the native kernels are unavailable (no C compiler)")
    threads = torch.get_num_threads()
    clock = time.process_time if threads == 1 else time.perf_counter
    fmt, m = args.format, args.rows
    paths = ["decode tiles"] + (["jneox_prompt_fma"] if fmt in ("float32", "bfloat16") and kernels.has_batch_path(lib)
                                else []) + ["GEMM blocks"]
    print(f"kernel level {kernels.simd_level(lib)}, {threads} thread(s) ({'CPU' if threads == 1 else 'wall'} time), "
          f"{fmt} weights, {m} rows, GEMM blocks in {'bf16' if fmt != 'float32' and quantize.native_bf16_matmul() else 'fp32'}\n")
    print("| linear (out × in) | " + " | ".join(f"{name} GFLOP/s" for name in paths) + " |")
    print("|---|" + "---|" * len(paths))
    total = dict.fromkeys(paths, 0.0)
    flops = 0
    torch.manual_seed(0)
    for n, k in SHAPES:
        packed = PackedLinear.from_linear(torch.nn.Linear(k, n), fmt)
        x, scale = torch.randn(m, k), getattr(packed, "scale", None)

        def fma():
            kernels.prompt_fma(lib, fmt, x, packed.weight, packed.bias, torch.empty(m, n), threads)

        run = {"decode tiles": lambda: kernels.linear(lib, fmt, x, packed.weight, scale, packed.bias,
                                                      torch.empty(m, n), packed.group_size, threads),
               "jneox_prompt_fma": fma, "GEMM blocks": lambda: packed._gemm_blocks(lib, x)}
        best = dict.fromkeys(paths, float("inf"))
        for name in paths:
            run[name]()
        for _ in range(args.repeats):  # the paths take turns: a slow spell of the machine falls on all
            for name in paths:
                t = clock()
                run[name]()
                best[name] = min(best[name], clock() - t)
        flops += 2 * m * n * k
        for name in paths:
            total[name] += best[name]
        print(f"| {n} × {k} | " + " | ".join(f"{2 * m * n * k / best[name] / 1e9:.0f}" for name in paths) + " |")
    print("| all four | " + " | ".join(f"**{flops / total[name] / 1e9:.0f}**" for name in paths) + " |")


if __name__ == "__main__":
    main()
