"""One decode kernel alone on one matrix shape: GB/s of weights read, from memory and from L2.

Decode reads every weight once per token, so its bound is the memory's read bandwidth (the
``jneox_read_bytes`` probe, as benchmarks/decode_speed.py measures it). This script separates the two
things a decode kernel can be capped by:

- ``memory``: one row of x times a rotation of distinct copies of the matrix, more bytes in all than the
  last-level cache holds: the speed decode sees, as a fraction of the probe;
- ``L2``: one row of x times a small matrix of the same K that stays in the cores' L2 caches, called over
  and over: the arithmetic's ceiling (what the kernel would reach with free memory reads).

When ``memory`` is well below the probe and ``L2`` is not far above ``memory``, the arithmetic caps the
kernel; when ``L2`` is far above, the memory stream (latency, prefetch) does. Wall-time columns need a
quiet machine; the per-core columns (process CPU time per thread) hold up better on a shared one.

    python benchmarks/kernel_speed.py                          # int4, bf16, int8; 1 and 2 threads
    python benchmarks/kernel_speed.py --formats int4 --shapes 2560x10240
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from jneox import kernels
from jneox.quantize import PackedLinear, huge_pages

BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}


def packed(fmt: str, k: int, n: int) -> PackedLinear:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    layer = PackedLinear.from_linear(linear, fmt)
    for name in ("weight", "scale"):
        t = getattr(layer, name, None)
        if t is not None:
            huge_pages(t)
    return layer


def copies(layer: PackedLinear, total_bytes: float) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Distinct copies of the layer's weight (and scale) adding up to about ``total_bytes``."""
    scale = getattr(layer, "scale", None)
    count = max(1, int(total_bytes // layer.weight.numel()))
    out = []
    for _ in range(count):
        w = layer.weight.clone()
        huge_pages(w)
        out.append((w, None if scale is None else scale.clone()))
    return out


def gbps(lib, fmt: str, mats, k: int, n: int, threads: int, seconds: float) -> tuple[float, float]:
    """Weight bytes per second over ``mats`` (called in turn), best of ten passes of about a tenth of
    ``seconds`` each: by wall time, and by the process's CPU time per thread (what a core does while it
    runs, whatever else shares the machine)."""
    x = torch.randn(1, k)
    y = torch.empty(1, n)
    nbytes = n * k * BYTES_PER_WEIGHT[fmt]
    for w, s in mats[:4]:  # threads started, pages in
        kernels.linear(lib, fmt, x, w, s, None, y, 64, threads)
    calls = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 10:
        w, s = mats[calls % len(mats)]
        kernels.linear(lib, fmt, x, w, s, None, y, 64, threads)
        calls += 1
    per_pass = max(len(mats), calls)  # a pass of about a tenth of ``seconds``
    best, best_cpu = float("inf"), float("inf")
    for _ in range(10):
        t, c = time.perf_counter(), time.process_time()
        for i in range(per_pass):
            w, s = mats[i % len(mats)]
            kernels.linear(lib, fmt, x, w, s, None, y, 64, threads)
        best = min(best, (time.perf_counter() - t) / per_pass)
        best_cpu = min(best_cpu, (time.process_time() - c) / threads / per_pass)
    return nbytes / best / 1e9, nbytes / best_cpu / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int4,bfloat16,int8")
    ap.add_argument("--shapes", default="2560x10240,10240x2560", help="KxN (in x out features), comma-separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--memory-gib", type=float, default=1.5, help="bytes of weight copies for the memory rows "
                    "(more than the last-level cache)")
    ap.add_argument("--l2-kib", type=int, default=768, help="weight bytes per thread for the L2 rows")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = ap.parse_args()
    lib = kernels.library()
    if lib is None:
        raise SystemExit("kernel_speed needs jneox's native kernels (a C compiler)")
    threads = [int(t) for t in args.threads.split(",")]
    buf = torch.ones(2**30 + 64, dtype=torch.uint8)
    huge_pages(buf)
    start = -buf.data_ptr() % 64
    probe = {t: kernels.read_bandwidth(lib, buf[start:start + 2**30], t) for t in threads}
    del buf
    print(f"kernels: simd level {kernels.simd_level(lib)}, int8 dot {kernels.int8_dot(lib)}; read probe: "
          + ", ".join(f"{t} thread(s) {probe[t]:.1f} GB/s" for t in threads))
    print(f"{'format':<10} {'K x N':>12} {'thr':>3} {'memory GB/s':>12} {'% probe':>8} {'L2 GB/s':>8} "
          f"{'L2 N':>5} {'per core (CPU time): memory':>28} {'L2':>6}")
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            big = copies(packed(fmt, k, n), args.memory_gib * 2**30)
            for t in threads:
                l2_n = max(4, int(args.l2_kib * 1024 * t / (k * BYTES_PER_WEIGHT[fmt])) // 16 * 16)
                small = copies(packed(fmt, k, l2_n), 0)
                mem, mem_cpu = gbps(lib, fmt, big, k, n, t, args.seconds)
                l2, l2_cpu = gbps(lib, fmt, small, k, l2_n, t, args.seconds)
                print(f"{fmt:<10} {shape:>12} {t:>3} {mem:>12.1f} {100 * mem / probe[t]:>7.0f}% {l2:>8.1f} "
                      f"{l2_n:>5} {mem_cpu:>28.1f} {l2_cpu:>6.1f}", flush=True)
            del big
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
